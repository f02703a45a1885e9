from nvfp4_titan.harness.cli import main

main()

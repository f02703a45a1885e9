"""Model families. Only Llama 3 for now."""

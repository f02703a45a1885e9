"""lm-evaluation-harness (lm-eval 0.4.13, the ``eval`` extra) for this project's models.

- ``nvfp4-titan``, an lm-eval model (``nvfp4_titan.harness.model.NVFP4TitanLM``): a run or
  ``step-N`` folder, a converted NVFP4 folder, a float Hugging Face folder and its PTQ.
- ``TASKS``, offline tasks (``tasks/README.md``): perplexity of the bundled plays or of any local
  corpus or run's held-out split, and the plays' next-line choice.

lm-eval finds models only in its own registry (``lm_eval/api/registry.py``: ``get_model`` knows
``lm_eval/models/__init__.py``'s ``MODEL_MAPPING`` and what this process registered; it reads no
entry points) and tasks in its own folder plus one ``--include_path``. So the stock ``lm_eval``
command cannot see either: ``nvfp4-lm-eval`` (``python -m nvfp4_titan.harness``) registers the
model, adds ``--include_path TASKS`` and runs lm-eval's own command line; from Python, importing
this package registers the model and ``task_manager()`` finds the tasks::

    import lm_eval, nvfp4_titan.harness as h
    lm_eval.simple_evaluate(model="nvfp4-titan", model_args={"path": "outputs/debug_cpu"},
                            tasks=["shakespeare_ppl"], task_manager=h.task_manager({"path": "outputs/debug_cpu"}))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

MODEL = "nvfp4-titan"
TASKS = Path(__file__).parent / "tasks"


def register() -> None:
    """Register ``nvfp4-titan`` with lm-eval (lazily: the model module loads on first use).
    lm-eval's own models are registered first: ``get_model`` only imports them while its
    registry is empty, so one entry of ours would hide ``hf`` and the rest."""
    try:
        import lm_eval.models  # noqa: F401  (registers lm-eval's models)
        from lm_eval.api.registry import model_registry
    except ImportError as e:
        raise ImportError(f"nvfp4_titan.harness needs lm-eval 0.4.13: pip install -e '.[eval]' ({e})") from None

    if MODEL not in model_registry:
        model_registry.register(MODEL, target="nvfp4_titan.harness.model:NVFP4TitanLM")


def task_manager(metadata: dict[str, Any] | None = None, include_defaults: bool = True) -> TaskManager:
    """lm-eval's ``TaskManager`` with the project's tasks. ``metadata`` reaches the tasks'
    document loaders: pass the model arguments merged with the tasks' keys (``data``,
    ``held_out_of``, ...), as lm-eval's command line merges ``--model_args`` and ``--metadata``.
    ``include_defaults=False`` skips indexing lm-eval's own ~15,000 task files (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=include_defaults, metadata=metadata or {})


def corpus_perplexity(
    model_args: dict[str, Any], documents: dict[str, Any], batch_size: int = 1, device: str | None = None
) -> dict[str, float]:
    """lm-eval's ``corpus_ppl`` of the ``nvfp4-titan`` model ``model_args`` on ``documents``
    (``{"data": PATH}`` or ``{"held_out_of": RUN}``; see ``documents.corpus``): its
    ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte`` and ``token_perplexity``, and
    what they count: ``nll`` (nats, summed over the documents), ``words``, ``bytes``, ``tokens``.

    Raises:
        as ``NVFP4TitanLM`` and ``documents.corpus``.
    """
    import lm_eval

    keys = ("path", "tokenizer", "prefix_token_id")  # what the documents' token counts depend on
    metadata = {k: str(v) if isinstance(v, Path) else v for k, v in model_args.items() if k in keys} | documents
    out = lm_eval.simple_evaluate(
        model=MODEL,
        model_args=model_args,
        tasks=["corpus_ppl"],
        batch_size=batch_size,
        device=device,
        log_samples=True,
        task_manager=task_manager(metadata, include_defaults=False),
    )
    samples = out["samples"]["corpus_ppl"]
    figures = {k.removesuffix(",none"): v for k, v in out["results"]["corpus_ppl"].items() if k.endswith(",none")}
    return {
        **{k: v for k, v in figures.items() if not k.endswith("_stderr")},
        "nll": -sum(s["word_perplexity"][0] for s in samples),
        "words": sum(s["word_perplexity"][1] for s in samples),
        "bytes": sum(s["byte_perplexity"][1] for s in samples),
        "tokens": sum(s["token_perplexity"][1] for s in samples),
    }


register()

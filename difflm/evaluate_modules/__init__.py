"""difflm's metrics as Hugging Face `evaluate` modules that load offline from the installed package:

    import evaluate
    from difflm.evaluate_modules import module_path
    diversity = evaluate.load(module_path("diversity"))
    diversity.compute(predictions=samples, reference_texts=held_out)

Modules: diversity, grammar, lm_score (compute(..., teacher=DIR)), elbo_bound (compute(..., model=DIR)).
"""

from pathlib import Path

from ..errors import DifflmError

MODULES = ("diversity", "grammar", "lm_score", "elbo_bound")


def module_path(name: str) -> str:
    """The local directory of the `evaluate` module `name`, for evaluate.load."""
    if name not in MODULES:
        raise DifflmError(f"unknown metric module {name!r}; choose one of {', '.join(MODULES)}")
    return str(Path(__file__).parent / name)

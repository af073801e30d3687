"""The built-in designs, one TOML file each (`akd design --design NAME`): a claim decided over teacher sets, its size
chosen by a power analysis before the runs (pipeline/design.py). Listed from the folder itself, as the plans are."""

from importlib import resources

NAMES = tuple(
    sorted(f.name.removesuffix(".toml") for f in resources.files(__name__).iterdir() if f.name.endswith(".toml"))
)


def design_text(name: str) -> str:
    """A built-in design's TOML (`name` must be one of NAMES)."""
    return resources.files(__name__).joinpath(f"{name}.toml").read_text()

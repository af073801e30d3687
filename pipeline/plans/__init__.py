"""The built-in plans, one TOML file each (`akd demo --plan NAME`); each file's header says what it is for and how
long it takes. Listed from the folder itself, so adding a file adds a plan."""

from importlib import resources

NAMES = tuple(
    sorted(f.name.removesuffix(".toml") for f in resources.files(__name__).iterdir() if f.name.endswith(".toml"))
)


def plan_text(name: str) -> str:
    """A built-in plan's TOML, header comments and all (`name` must be one of NAMES)."""
    return resources.files(__name__).joinpath(f"{name}.toml").read_text()

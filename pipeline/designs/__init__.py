"""The built-in designs, one TOML file each (`akd design --design NAME`): a claim decided over teacher sets, its size
chosen by a power analysis before the runs (pipeline/design.py)."""

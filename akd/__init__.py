"""The `akd` command, above every package: it may name any of them, and none imports it but a `__main__` module.

cli   the subcommands as data, each with the module that implements it (imported only when it runs)
"""

"""The evaluation attacks and AutoAttack versions a user can name. Torch-free, so `akd eval --help` stays instant."""

EVAL_ATTACKS = ("clean", "pgd", "autoattack")

# What each AutoAttack version runs, recorded beside every AutoAttack number. "standard" is pyautoattack's own
# (AutoAttack._set_version); "apgd" is its APGD-CE + APGD-T subset with standard's settings (1 restart, 9 target
# classes): on a CPU, FAB-T and Square cost most of the time and rarely change the number for adversarially trained
# models, so it is the version that affords 500+ images there, named as the subset wherever it is reported.
AUTOATTACK_VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd": ("apgd-ce", "apgd-t")}

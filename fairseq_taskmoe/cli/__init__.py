"""The console commands of setup.cfg, one small file each: prune.py (taskmoe-prune),
consolidate.py (taskmoe-consolidate), export.py (taskmoe-export), flags.py (taskmoe-flags),
serve.py (taskmoe-serve), upcycle.py (taskmoe-upcycle). Each parses its flags and calls into deploy/, distributed/ or serve/;
the top of the package with serve/, nothing below imports it.
"""

"""`mailappliance import qmail`: carry a qmail + vpopmail host over (docs/MIGRATION.md).

qmailfiles.py   pure parsers of qmail control files, users/assign, vpasswd and .qmail files
source.py       reads a qmail + vpopmail tree into a Plan (blocking reads, changes nothing)
toml_out.py     the configuration file to review, from qmail's control files (pure)
execute.py      applies a Plan: user store writes, Maildir moves or hard links (restartable)
report.py       the report the operator reads (pure)
command.py      the command line glue
"""

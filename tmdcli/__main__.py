"""`python -m tmdcli`: the `tmd` command. A Ctrl-C while its modules load still exits 130, like one during a stage."""

import sys

try:
    from tmdcli.cli import main
except KeyboardInterrupt:
    sys.exit(130)

main()

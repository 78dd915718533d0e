from tmdcli.cli import main

main()

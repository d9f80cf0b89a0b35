from localmix.cli.app import main

main()

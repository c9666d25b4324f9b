from slidr.cli import main

main()

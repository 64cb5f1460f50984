from reap.cli import main

main()

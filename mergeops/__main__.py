from mergeops.cli import main

main()

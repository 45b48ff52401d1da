from spotex.cli import main

main()

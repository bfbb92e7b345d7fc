from ekx.cli import main

main()

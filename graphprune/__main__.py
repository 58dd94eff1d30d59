from graphprune.cli import main

main()

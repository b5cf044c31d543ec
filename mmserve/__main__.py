from mmserve.cli import main

main()

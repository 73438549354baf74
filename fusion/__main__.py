from fusion.train import main

main()

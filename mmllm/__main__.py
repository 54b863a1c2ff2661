from mmllm.cli import main

main()

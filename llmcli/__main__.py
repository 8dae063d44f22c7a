from llmcli.entry import main

main()

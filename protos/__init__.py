"""The wire contracts: serving.proto (the client API) and kvtransfer.proto (the gRPC KV
backend), their generated stubs (never edited by hand) and the script that regenerates them.
Imports no other project package: it is the bottom layer."""

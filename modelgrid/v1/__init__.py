"""Generated gRPC code for modelgrid.v1. Do not edit: run scripts/gen_protos.py."""

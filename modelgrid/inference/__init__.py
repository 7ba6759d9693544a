"""Generated gRPC code for the KServe Open Inference Protocol v2 (package inference). Do not edit: run scripts/gen_protos.py."""

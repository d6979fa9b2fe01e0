"""The gRPC edge: parse and convert requests, call the manager, map errors.

server.py builds the grpc.Server; servicer.py holds methods of a few lines;
convert.py turns protobuf messages into specs and domain objects into
messages; status.py is the one table from exceptions to status codes.
Generated code lives in _gen/ (proto/generate.py).
"""

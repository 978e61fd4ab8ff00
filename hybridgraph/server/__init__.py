"""Unix-socket graph server, its clients, and the wire protocol.

Kept import-free so a client process never loads torch or the model layer.
"""

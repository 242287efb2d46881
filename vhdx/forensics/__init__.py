"""Forensic inspection: what each checkpoint wrote (diff), hashes, slack space, read-only export (NBD, FUSE)."""

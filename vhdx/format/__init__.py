"""Pure declarations of the VHDX on-disk format: constants, construct layouts, checksums. No I/O here."""

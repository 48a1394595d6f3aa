"""The on-disk format: manifest (schema, seal, typed view), store (disk I/O), hashing, untrusted input, measurements."""

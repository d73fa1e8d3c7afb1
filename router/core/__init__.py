"""The pure routing core: hashing, ring, bounded load and policies. No I/O lives here."""

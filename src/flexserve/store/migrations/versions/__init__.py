"""Migration revisions, one per file, ids "0001", "0002", …"""

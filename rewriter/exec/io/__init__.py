"""Byte movement: copying planned byte ranges into outputs, the files they write, throttles."""

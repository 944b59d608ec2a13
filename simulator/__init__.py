"""Local stand-in for WhatsApp Web's linking flow and for the user's phone.

See ``simulator/README.md`` for the contract.
"""

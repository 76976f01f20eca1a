"""What every package shares: stack settings, credentials, stages, hashing, the closed-network switch.

The bottom of the import graph: it imports nothing from the project, and every
other package may import it.
"""

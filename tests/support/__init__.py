"""What only tests use: the one domain-XML builder, a fixed clock, varstore readers.

Product code never imports from here (tests/test_architecture.py holds varsd to its own
packages); a function moves here when nothing in varsd calls it any more.
"""

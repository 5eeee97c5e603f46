"""p2pfl: fully decentralized peer-to-peer learning."""

__version__ = "0.1.0"

"""Slicefab host driver library: what a VM uses to talk to the offload device."""

"""Slicefab firmware: the Resource Allocation Manager of the emulated offload device."""

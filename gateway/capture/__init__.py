"""The capture door: BCC and forwarded mail to the capture address, proven before it is logged."""

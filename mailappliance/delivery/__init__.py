"""Deliverers (qmail-local, qmail-remote) and the Maildir writer, below the queue.

The queue manager hands each delivery its envelope and a message source (interfaces.py); the
deliverers never import the queue. A delivery attempt ends in one `mailappliance.envelope.Result`
per recipient: success (mark done), deferral (retry on the schedule) or failure (bounce).
"""

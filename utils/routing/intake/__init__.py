"""The router's ways in: the Storage SCP (scp.py, with wakeup.py and the shared TLS set-up), the Orthanc
change-feed puller (orthanc_source.py), and the free-space reserve both obey (space.py). Everything
received is stored through :meth:`utils.routing.queue.SpoolQueue.store` before it is acknowledged."""

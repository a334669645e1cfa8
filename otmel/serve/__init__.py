"""The linking service on Ray Serve: request rules (`requests`), the deployment (`app`), `otmel serve` (`run`)."""

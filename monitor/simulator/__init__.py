"""A fake Microsoft cloud over real HTTPS: Entra token, Graph and Defender."""

"""What each page shows, as functions of the API client."""

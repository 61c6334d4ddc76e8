"""The Streamlit fleet dashboard; it reads the cloud REST API only, never the database."""

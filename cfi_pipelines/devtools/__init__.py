"""Development tools: demo data, the embedded SFTP server, the fake CFI API."""

from fusechat.cli import app

app()

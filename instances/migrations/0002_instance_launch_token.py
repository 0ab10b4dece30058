from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("instances", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="instance",
            name="launch_token",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
    ]

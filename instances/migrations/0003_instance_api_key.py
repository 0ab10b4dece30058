import secrets

from django.db import migrations, models


def give_each_instance_a_key(apps, schema_editor):
    # An instance launched before this runs without its key until its next start.
    Instance = apps.get_model("instances", "Instance")
    for instance in Instance.objects.filter(api_key=""):
        instance.api_key = secrets.token_urlsafe(32)
        instance.save(update_fields=["api_key"])


class Migration(migrations.Migration):

    dependencies = [
        ("instances", "0002_instance_launch_token"),
    ]

    operations = [
        migrations.AddField(
            model_name="instance",
            name="api_key",
            field=models.CharField(blank=True, default="", editable=False, max_length=64),
        ),
        migrations.RunPython(give_each_instance_a_key, migrations.RunPython.noop),
    ]

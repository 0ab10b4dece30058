from django.apps import AppConfig


class MultiplexerConfig(AppConfig):
    name = "multiplexer"
    verbose_name = "gRPC multiplexer"

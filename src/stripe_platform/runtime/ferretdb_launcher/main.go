// Command ferretdb-launcher runs FerretDB v1 through its embeddable package
// (github.com/FerretDB/FerretDB/ferretdb), which avoids the `go install .../cmd/ferretdb`
// binary's start-up panic on the missing build/version/version.txt.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "plain TCP listen address (empty disables)")
	listenTLS := flag.String("listen-tls", "", "TLS listen address (empty disables)")
	tlsCert := flag.String("tls-cert-file", "", "server certificate (PEM)")
	tlsKey := flag.String("tls-key-file", "", "server key (PEM)")
	tlsCA := flag.String("tls-ca-file", "", "CA certificate for client certificates (PEM, optional)")
	unix := flag.String("listen-unix", "", "Unix socket path (empty disables)")
	pgURL := flag.String("postgresql-url", os.Getenv("FERRETDB_POSTGRESQL_URL"), "PostgreSQL URL (or $FERRETDB_POSTGRESQL_URL)")
	handler := flag.String("handler", "postgresql", "backend: postgresql or sqlite")
	sqliteURL := flag.String("sqlite-url", "file:data/", "SQLite directory URI for the sqlite handler")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	flag.Parse()

	// The embeddable package never starts the telemetry reporter; say so to anything else too.
	os.Setenv("DO_NOT_TRACK", "1")

	// FerretDB v1 passes a client's PLAIN credentials through to PostgreSQL and, for a client
	// that sent none, connects with whatever the URL and pgx's libpq-style defaults give
	// (PGUSER, PGPASSWORD, ~/.pgpass). Scrub them so an unauthenticated client gets nothing.
	for _, k := range []string{"PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE"} {
		os.Unsetenv(k)
	}
	os.Setenv("PGPASSFILE", os.DevNull)

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "bad -log-level:", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	if *handler == "postgresql" && *pgURL == "" {
		fmt.Fprintln(os.Stderr, "-postgresql-url (or FERRETDB_POSTGRESQL_URL) is required")
		os.Exit(2)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{
			TCP:         *listen,
			Unix:        *unix,
			TLS:         *listenTLS,
			TLSCertFile: *tlsCert,
			TLSKeyFile:  *tlsKey,
			TLSCAFile:   *tlsCA,
		},
		Logger:        logger,
		Handler:       *handler,
		PostgreSQLURL: *pgURL,
		SQLiteURL:     *sqliteURL,
	})
	if err != nil {
		logger.Error("start failed", "error", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	logger.Info("ferretdb-launcher running", "tcp", *listen, "tls", *listenTLS, "unix", *unix)
	if err := f.Run(ctx); err != nil {
		logger.Error("run failed", "error", err)
		os.Exit(1)
	}
	logger.Info("ferretdb-launcher stopped")
}

// Command kgs-ferretdb runs FerretDB v1 (a MongoDB-compatible server) with its
// SQLite backend on a loopback port, as the second MongoDB-wire server of the
// kgs tests.
//
// It embeds FerretDB's public `ferretdb` package instead of `go install`ing
// its command, which panics on a missing build-version file (FerretDB #2982).
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27018", "TCP address to listen on")
	dataDir := flag.String("data-dir", "./ferretdb-data", "directory of the SQLite databases")
	flag.Parse()

	if err := os.MkdirAll(*dataDir, 0o755); err != nil {
		log.Fatalf("kgs-ferretdb: creating data dir: %v", err)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Handler:  "sqlite",
		// FerretDB wants a file: URI of a directory, with a trailing slash.
		SQLiteURL: "file:" + *dataDir + "/",
	})
	if err != nil {
		log.Fatalf("kgs-ferretdb: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	log.Printf("kgs-ferretdb: listening on %s, data in %s", *listen, *dataDir)
	f.Run(ctx)
	log.Printf("kgs-ferretdb: stopped")
}

// Renders Go templates the way Ollama renders a Modelfile's TEMPLATE (Go's text/template, with the conversation
// as .Messages of Role and Content), so the tests check loratune's Go templates with Go itself.
//
// Reads a JSON list of {"template", "messages", "prompt"} cases on stdin; writes the JSON list of renderings.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Prompt   string    `json:"prompt"`
}

// The fields of Ollama's template values that loratune's templates may use.
type Values struct {
	Messages []Message
	Prompt   string
	System   string
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "reading cases:", err)
		os.Exit(2)
	}
	out := make([]string, len(cases))
	for i, c := range cases {
		t, err := template.New("modelfile").Option("missingkey=error").Parse(c.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, "parsing template", i, ":", err)
			os.Exit(1)
		}
		var b strings.Builder
		if err := t.Execute(&b, Values{Messages: c.Messages, Prompt: c.Prompt}); err != nil {
			fmt.Fprintln(os.Stderr, "rendering template", i, ":", err)
			os.Exit(1)
		}
		out[i] = b.String()
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "writing renderings:", err)
		os.Exit(2)
	}
}
